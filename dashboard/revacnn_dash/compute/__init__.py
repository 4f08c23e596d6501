"""The dashboard's computations on a run's data, free of Dash and of I/O: the layer hierarchy (``layers``),
filter embeddings and their alignment (``embeddings``) and the service that computes them off the request path
(``embedding_service``), redundancy hints (``redundancy``) and a small LRU cache (``cache``).

The offline analysis of recorded runs (snapshot comparison, the training-log explorer, tracking, observations)
is the sibling package ``revacnn_dash.analysis``."""
