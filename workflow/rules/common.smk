# Shared helpers for the rules: paths of this run, the evspec command, and the
# code fingerprints that make Snakemake rerun a rule when the code it runs changes.
import json
import sys

# Hash of the evspec modules a rule runs: a param, so editing them reruns the rule
# (Snakemake tracks a rule's own code but not what its command imports).
from evspec.fingerprint import code_version

RESULTS = f"results/{config['run']}"
REPORTS = f"reports/{config['run']}"
LOGS = f"{RESULTS}/logs"
# The interpreter running Snakemake has evspec installed (make demo sets that up).
EVSPEC = f"{sys.executable} -m evspec"


def as_json(value):
    """A config section as one canonical JSON argument (and a rerun trigger through params)."""
    return json.dumps(value, sort_keys=True)


# Modules every stage imports.
CORE_MODULES = ("__main__.py", "errors.py", "atomic.py", "settings.py", "h5.py")
