"""OpenVINO runtime side of the appliance: devices, the model store and its specs, loaded models and their swaps."""
