from gpufleet.emulator.main import main

main()
