"""The commands' work, one module each: ``cache_teachers`` (stage one), ``train_student``
(stage two), ``train_teacher`` and ``verify`` (inspect + verify). No stage imports another."""
