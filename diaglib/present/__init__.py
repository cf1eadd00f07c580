"""What the user sees: the report, figures and widget panels."""
