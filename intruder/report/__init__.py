"""Reports: versioned JSON schema, terminal tables, plots (matplotlib), self-contained HTML."""
