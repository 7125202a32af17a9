from pmd.cli import main

main()
