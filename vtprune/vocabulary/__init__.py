"""The words adapters, strategies and the engine share: token grids and segments, sequence layouts, and the one
transformers version difference. Nothing here knows a model class or a strategy; import the modules themselves
(``vtprune.vocabulary.grids``, ``.layout``, ``.compat``) so that reading a grid never imports transformers."""
