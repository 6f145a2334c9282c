from oprd.cli.main import main

main()
