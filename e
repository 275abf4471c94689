timeout: failed to run command ‘./bd’: No such file or directory
