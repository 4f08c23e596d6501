"""revacnn-dash: the Plotly Dash dashboard. Never imports torch."""
