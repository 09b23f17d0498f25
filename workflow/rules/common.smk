# Shared helpers for the rules: paths of this run, the evspec command, and the
# code fingerprints that make Snakemake rerun a rule when the code it runs changes.
import json
import sys

# Hash of the evspec source a rule's command runs (its imports, closed): a param, so editing a module
# reruns exactly the rules whose commands import it (Snakemake tracks a rule's own code, not its imports).
from evspec.fingerprint import command_code

RESULTS = f"results/{config['run']}"
REPORTS = f"reports/{config['run']}"
LOGS = f"{RESULTS}/logs"
# The interpreter running Snakemake has evspec installed (make demo sets that up).
EVSPEC = f"{sys.executable} -m evspec"


def as_json(value):
    """A config section as one canonical JSON argument (and a rerun trigger through params)."""
    return json.dumps(value, sort_keys=True)

