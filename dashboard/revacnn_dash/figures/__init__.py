"""Figure and table builders of the dashboard's views: plain functions from view models to Plotly figures or Dash
HTML, no callbacks and no run state."""
