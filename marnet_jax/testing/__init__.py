"""What tests and users trying the project need besides the library: fixtures.py writes small
releases in the real datasets' layouts (docs: README, "Real datasets"), so that the builders and the
pipeline can be tried without the datasets themselves."""
