"""`python -m inference_svc [serve] --model ...`: the same as `./tinylm serve`."""

import sys

from inference_svc.main import main

if __name__ == "__main__":
    sys.exit(main())
