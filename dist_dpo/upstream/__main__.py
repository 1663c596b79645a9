"""`python -m dist_dpo.upstream`: whether every upstream internal dist-dpo relies on holds at the installed versions."""

import sys

from dist_dpo.upstream import INTERNALS, problems

found = problems()
print("\n".join(found) if found else f"all {len(INTERNALS)} upstream internals hold at the installed versions")
sys.exit(1 if found else 0)
