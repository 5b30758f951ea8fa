from chatlm.bench.stage import main

main()
