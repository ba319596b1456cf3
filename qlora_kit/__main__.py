from qlora_kit.cli.app import main

main()
