import not_a_real_dependency_xyz  # noqa: F401  (missing on purpose)
