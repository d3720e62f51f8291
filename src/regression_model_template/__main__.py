"""``python -m regression_model_template``: the command line."""

from regression_model_template.cli import entry_point

if __name__ == "__main__":
    entry_point()
