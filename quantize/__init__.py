"""Post-training int8 quantization of ImageNet classifiers."""
