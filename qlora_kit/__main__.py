from qlora_kit.cli import main

main()
