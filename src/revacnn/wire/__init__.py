"""The wire: the protocol's messages (``protocol``), the trainer's sockets (``publisher``), a client of them
(``client``) and the connection file that tells a client where they are (``connection``). Torch-free."""
