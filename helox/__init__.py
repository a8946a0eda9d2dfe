"""The helox command line: local stack, runs, inspection."""
