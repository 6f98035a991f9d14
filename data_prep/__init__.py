"""ImageNet preparation commands (the vendor flow's scripts): ``python -m data_prep <command> --help``."""
