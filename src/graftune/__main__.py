from graftune.cli import main

main()
