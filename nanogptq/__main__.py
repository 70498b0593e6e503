from nanogptq.cli import main

main()
