"""Reports: tables, pages, sheets and figures, and the eval, sweep and study reports built from them."""
