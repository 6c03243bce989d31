"""``python -m lab_utils.report``: run the notebooks and build the report."""

import sys

from lab_utils.report.runner import main

sys.exit(main())
