"""``usjepa-probe``: the paper's evaluation protocol (linear probe, few-shot, corruption robustness).

Modules: ``data`` (labelled sets and grouped splits), ``encoders`` (encoder specs -> frozen models),
``features`` (preprocessing, extraction, on-disk cache), ``linear`` (Table 6 probes, all seeds at once),
``metrics`` (macro F1 and friends, few-shot subsets), ``report`` (markdown and plots), ``run``
(``probe_encoders``, the Python entry point), ``cli`` (``usjepa-probe``). See docs/probe.md.
"""
