"""On-device training: anomaly models from a few good images, synthetic defects and demo parts to check them."""
