"""The study: the seed's comparisons run end to end. Each run of a set changes one thing against a baseline; every
run is trained on every seed, scored the same way, and tabulated with its uncertainty against its reference.

    python -m pipeline.study --set mnist          # configs/experiments/mnist.yaml; docs/study.md reads the results

One job per module, in the order a study goes:

- ``sets``: a set file (``configs/experiments/<set>.yaml``) and its overlays decoded into a checked ``StudySet``
  (torch-free, so a bad set or flag is refused before anything heavy loads).
- ``runner``: each run's config, its training in a subprocess (skipped or continued when already done), its
  evaluations (cached beside the run), and ``run_study``, which writes ``results.json`` and calls the report.
- ``statistics``: means, standard deviations and differences with standard errors over seeds (standard library only).
- ``report``: ``results.md`` from the rows of ``results.json``, and the figures from the trained runs.
- ``__main__``: the command line.

The modules are imported by their own names (``from pipeline.study.sets import load_set``); this package exports
nothing itself, so importing one of them loads only what it needs.
"""
