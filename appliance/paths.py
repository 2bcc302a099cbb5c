"""Where the appliance finds what it ships and keeps what it writes, and the one setting that overrides each.

Everything the code needs to run ships inside the package (``appliance/firmware_profiles/``): an installed
wheel works from any folder. What it writes goes where the platform says: systemd's ``CacheDirectory=`` (the
unit sets ``CACHE_DIRECTORY``), else the XDG base directories, else the project folder (docs/install.md).

=====================  ==========================  =====================================================
what                   one setting                 default, in order
=====================  ==========================  =====================================================
firmware profiles      ``APPLIANCE_PROFILES_DIR``  the package's ``appliance/firmware_profiles/``
pretrained model store ``APPLIANCE_MODEL_STORE``   ``models/`` of a source checkout; else
                                                   ``$XDG_DATA_HOME/appliance/models``
                                                   (``~/.local/share/appliance/models``)
model wheel cache      ``APPLIANCE_WHEEL_CACHE``   ``$CACHE_DIRECTORY/wheels``; else
                                                   ``$XDG_CACHE_HOME/appliance/wheels`` (``~/.cache/...``)
OpenVINO model cache   ``cache_dir`` (project)     ``$CACHE_DIRECTORY/openvino``; else
                                                   ``$XDG_CACHE_HOME/appliance/openvino`` when set; else
                                                   ``<project>/.cache/openvino``
=====================  ==========================  =====================================================
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    # systemd joins several directories with ':' (CacheDirectory=a b); the first is ours.
    return Path(value.split(":")[0]) if value else None


def source_checkout() -> Path | None:
    """The repository folder when the package runs from a source checkout (`pip install -e`), else None."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "appliance" / "__init__.py").is_file() else None


def profiles_dir() -> Path:
    return _env_path("APPLIANCE_PROFILES_DIR") or PACKAGE_DIR / "firmware_profiles"


def xdg_cache_home() -> Path:
    return _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"


def xdg_data_home() -> Path:
    return _env_path("XDG_DATA_HOME") or Path.home() / ".local" / "share"


def model_store() -> Path:
    """The pretrained store (`make models`, model_supply) that training reads its backbone from."""
    configured = _env_path("APPLIANCE_MODEL_STORE")
    if configured:
        return configured
    checkout = source_checkout()
    if checkout is not None:
        return checkout / "models"
    return xdg_data_home() / "appliance" / "models"


def wheel_cache() -> Path:
    """Where model_supply keeps the pinned model wheels it fetched (a wheelhouse's models/ folder works too)."""
    configured = _env_path("APPLIANCE_WHEEL_CACHE")
    if configured:
        return configured
    systemd = _env_path("CACHE_DIRECTORY")
    return systemd / "wheels" if systemd else xdg_cache_home() / "appliance" / "wheels"


def openvino_cache(project_dir: Path) -> Path:
    """OpenVINO's compiled-model cache for a project whose project.yaml sets no ``cache_dir``."""
    systemd = _env_path("CACHE_DIRECTORY")
    if systemd:
        return systemd / "openvino"
    xdg = _env_path("XDG_CACHE_HOME")
    if xdg:
        return xdg / "appliance" / "openvino"
    return project_dir / ".cache" / "openvino"
