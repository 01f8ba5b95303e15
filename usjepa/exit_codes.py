"""Exit statuses shared by ``usjepa-ingest``, ``usjepa-train`` and ``usjepa-probe``.

One table, printed at the end of each tool's ``--help``, so that a job script can tell a usage mistake
(fix the command, rerun) from a run that finished with skipped inputs (look at the report) from a failure.
"""

OK = 0        # finished, nothing skipped
FAILED = 1    # failed while running, or `usjepa-ingest verify` found problems
USAGE = 2     # bad command line, config or input named by the user; one line on stderr says which
SKIPPED = 3   # finished, but some inputs were skipped (each listed, with its reason, in the report/manifest)

EXIT_STATUS_HELP = (
    "exit status: 0 = finished, nothing skipped; 1 = failed (or verify found problems);\n"
    "2 = usage or config error (one line on stderr says what);\n"
    "3 = finished, some inputs skipped (listed with a reason in the manifest / report)."
)
