"""The wire: the protocol's messages (``protocol``), the steering vocabulary (``ops``: command ops; ``acks``: acks
and run states), the trainer's sockets (``publisher``, with ``control`` answering requests and ``curve_auth``
deciding who may connect), a client of them (``client``) and the connection file that tells a client where they
are (``connection``). Torch-free."""
