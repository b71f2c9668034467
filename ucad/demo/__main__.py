from ucad.demo.data import main

main()
