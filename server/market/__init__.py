"""Market data: feed formats and the MarketListener that turns ticks into stop-loss triggers."""
