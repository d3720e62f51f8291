"""``python -m regression_model_template``: the command line."""

import sys

from regression_model_template.cli import main

if __name__ == "__main__":
    sys.exit(main())
