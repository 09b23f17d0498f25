# Shared helpers for the rules: paths of this run, the evspec command, and the
# code fingerprints that make Snakemake rerun a rule when the code it runs changes.
import hashlib
import json
import sys

RESULTS = f"results/{config['run']}"
REPORTS = f"reports/{config['run']}"
LOGS = f"{RESULTS}/logs"
# The interpreter running Snakemake has evspec installed (make demo sets that up).
EVSPEC = f"{sys.executable} -m evspec"


def as_json(value):
    """A config section as one canonical JSON argument (and a rerun trigger through params)."""
    return json.dumps(value, sort_keys=True)


def code_version(*modules):
    """Hash of the evspec modules a rule runs: a param, so editing them reruns the rule.

    Snakemake tracks a rule's own code but not what its command imports.
    """
    source = PROJECT / "src" / "evspec"
    digest = hashlib.sha256()
    for module in sorted(modules):
        path = source / module
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(source)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


# Modules every stage imports.
CORE_MODULES = ("__main__.py", "errors.py", "atomic.py", "settings.py", "h5.py")
