"""Train the ReVACNN demo model on sklearn's digits with ReVACNNCallback — see revacnn/demo/train_digits.py.

    python examples/train_digits.py --epochs 20 --slow 0.05
    revacnn-dash --connect lightning_logs/version_0/revacnn/connection.json

The whole integration is one line: ``pl.Trainer(..., callbacks=[ReVACNNCallback()])``.
"""

from revacnn.demo.train_digits import main

if __name__ == "__main__":
    main()
