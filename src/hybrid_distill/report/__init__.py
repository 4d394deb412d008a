"""Tables, figures and a Markdown report built from the workflow's evaluation, efficiency and selection files."""
