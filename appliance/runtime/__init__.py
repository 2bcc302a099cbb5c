"""OpenVINO runtime side of the appliance: devices, pretrained-model supply, torch-free weights and backbones."""
