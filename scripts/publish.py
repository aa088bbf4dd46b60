"""Stage (and push) a trained DeepScaleLM checkpoint as a Hub repository: the `dslm-publish` command as a script.

    python scripts/publish.py runs/deep-48/final --repo_id org/deepscalelm-48 --eval_file runs/deep-48/eval_results.json --dry_run

See `python scripts/publish.py --help` and docs/publishing.md.
"""

import sys

from dslm_hf.publishing import main

if __name__ == "__main__":
    sys.exit(main())
