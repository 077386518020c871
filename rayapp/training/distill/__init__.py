"""`kind: distill` — train a student to mimic a teacher; ``method`` picks how.

``recipe.py`` reads top to bottom (student, data, training, answer accuracy, the shared ending)
and looks its method up once in ``METHODS``. One module per method (``step_by_step``, ``logits``,
``features``, ``relations``, ``self_distill``) says how that method builds its data on the driver,
its model and loss in each worker, and, for methods that train in rounds, the rounds.
``method.py`` holds what they build on; ``data.py`` the items and collation; ``teacher.py`` the
teacher output computed on the driver and cached as files.
"""
