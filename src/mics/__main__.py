from mics.cli import main

main()
