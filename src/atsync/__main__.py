from atsync.cli import main

main()
