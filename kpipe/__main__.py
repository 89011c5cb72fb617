from kpipe.cli.app import main

main()
