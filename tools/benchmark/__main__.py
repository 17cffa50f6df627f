from tools.benchmark.run import main

main()
