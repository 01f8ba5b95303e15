"""``usjepa-probe``: the paper's evaluation protocol (linear probe, few-shot, corruption robustness).

Modules: ``labels`` (labels from file names or a CSV), ``data`` (labelled sets and leak-proof grouped
splits), ``encoders`` (encoder specs -> frozen models), ``features`` (ingest's preprocessing, extraction,
on-disk cache), ``linear`` (Table 6 probes on standardised features, all seeds at once), ``logreg``
(scikit-learn's logistic regression, the reference), ``metrics`` (macro F1 and friends, few-shot subsets),
``report`` (markdown and plots), ``run`` (``probe_encoders``, the Python entry point), ``cli``
(``usjepa-probe``). See docs/probe.md.
"""
