"""The model zoo: architectures per source, their checkpoint readers, the registry, complexity counts."""
