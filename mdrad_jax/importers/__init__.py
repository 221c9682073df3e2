"""Networks trained elsewhere as teachers: reading weight files (``files``), the supported source
architectures and their conversion (``archs``), and the ``import_teacher`` job (``job``).  See
docs/teachers.md."""
