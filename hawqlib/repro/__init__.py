"""The companion floor: what reproduces the paper on top of the method, and nothing of the method itself.

:mod:`hawqlib` is the method (blocks, Hessian, quantizers, allocation, order, staged fine-tuning, size, export,
models and the front door :func:`hawqlib.quantize`) and imports nothing from here. This subpackage adds what a
reproduction needs around the very same functions: caching, seeds and recipes.

- :mod:`~hawqlib.repro.artifacts`: the artifact cache (keys, manifests with file digests, one writer per
  folder, verified loads);
- :mod:`~hawqlib.repro.paths` and :mod:`~hawqlib.repro.profiles`: where files go, and the tables that size
  every experiment (``smoke``, ``cpu``, ``paper``);
- :mod:`~hawqlib.repro.data`, :mod:`~hawqlib.repro.batches`, :mod:`~hawqlib.repro.sources` and
  :mod:`~hawqlib.repro.imagenet`: CIFAR-10 and ImageFolder data, decoded once and digested;
- :mod:`~hawqlib.repro.baseline`, :mod:`~hawqlib.repro.pipeline` and :mod:`~hawqlib.repro.cached_quantize`: the
  paper's steps as cached steps, each calling the method's function for that step;
- :mod:`~hawqlib.repro.experiments` and :mod:`~hawqlib.repro.study`: the paper's named runs, and the
  :class:`~hawqlib.repro.study.Study` that the notebooks and the command line share;
- :mod:`~hawqlib.repro.seedstats`: verdicts over fine-tuning seeds;
- :mod:`~hawqlib.repro.pages`, :mod:`~hawqlib.repro.book` and :mod:`~hawqlib.repro.bookbuild`: the book's
  page helpers and its runner;
- :mod:`~hawqlib.repro.cli`: ``python -m hawqlib`` (train, finetune, quantize, book, seal).

Nothing here is from the paper; the paper's equations are all on the method floor.
"""
