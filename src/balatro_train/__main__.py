from balatro_train.train import main

main()
